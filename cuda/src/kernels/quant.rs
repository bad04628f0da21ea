//! `kernels/cu/quant.cu`: activations into INT8 ([`QuantizeArgs`]), the requantising
//! epilogue of INT8 layers ([`RequantArgs`]) and the depthwise INT8 convolution
//! ([`DwConvI8Args`]), with their CPU references — the same arithmetic as the engine's
//! INT8 emulation (`kiln_engine::quant::int8`).

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, opt_ptr, ptr, run, stride_blocks};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

const THREADS: u32 = 256;

/// FP32 or FP16 values at `src` to INT8 at `dst` with one scale: `n / padded` rows of
/// `channels` values each, stored as rows of `padded ≥ channels` bytes (zeros after).
#[derive(Debug, Clone)]
pub struct QuantizeArgs {
    pub src: DevPtr,
    pub src_elem: Elem,
    pub dst: DevPtr,
    /// Destination elements.
    pub n: usize,
    pub scale: f32,
    pub channels: usize,
    pub padded: usize,
}

impl QuantizeArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        self.src_elem.float_index("quantize source")?;
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(invalid(format!("quantize scale {} must be finite and positive", self.scale)));
        }
        if self.channels == 0 || self.padded < self.channels || !self.n.is_multiple_of(self.padded) {
            return Err(invalid(format!(
                "quantize: {} elements are not rows of {} ≥ {} channels",
                self.n, self.padded, self.channels
            )));
        }
        if self.n == 0 {
            return Ok(None);
        }
        let args = vec![
            ptr(self.src, "quantize src")?,
            KArg::I32(self.src_elem.code()),
            ptr(self.dst, "quantize dst")?,
            KArg::I64(long(self.n, "quantize n")?),
            KArg::F32(self.scale),
            KArg::I32(int(self.channels, "quantize channels")?),
            KArg::I32(int(self.padded, "quantize padded channels")?),
        ];
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(self.n, THREADS), THREADS), args }))
    }
}

/// The activation an INT8 layer's epilogue applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Int8Act {
    None,
    Relu,
    Clip { lo: f32, hi: f32 },
}

/// What an INT8 layer writes: FP32, FP16, or INT8 for a following INT8 layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Int8Out {
    F32,
    F16,
    /// Requantised with the next layer's input scale, after rounding to FP16 in an FP16
    /// plan (`via_f16`), where the next layer would have read an FP16 value.
    I8 {
        scale: f32,
        via_f16: bool,
    },
}

/// An INT8 layer's accumulators to its `n` outputs: `acc·alpha[k] + bias[k] + residual`,
/// the activation, then the output type; `k = (i / inner) % channels`.
#[derive(Debug, Clone)]
pub struct RequantArgs {
    pub acc: DevPtr,
    /// [`Elem::I32`] (cuBLASLt, the depthwise kernel) or [`Elem::F32`] (cuDNN).
    pub acc_elem: Elem,
    /// Accumulators per row when channels are last (`inner == 1`): ≥ `channels`.
    pub acc_ld: usize,
    pub out: DevPtr,
    pub out_kind: Int8Out,
    /// `input_scale · weight_scale[k]`, one per channel (FP32, on the device).
    pub alpha: DevPtr,
    pub bias: Option<DevPtr>,
    pub residual: Option<(DevPtr, Elem)>,
    pub n: usize,
    pub channels: usize,
    /// Elements per channel index: 1 for channels-last, H·W for NCHW.
    pub inner: usize,
    pub act: Int8Act,
    /// Also the output requantised to INT8 here, with this scale, after rounding to FP16
    /// when the flag is set (the INT8 readers of a tensor that others read in FP16).
    pub also_i8: Option<(DevPtr, f32, bool)>,
}

impl RequantArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        if self.channels == 0 || self.inner == 0 {
            return Err(invalid("requant needs at least one channel and inner = 1 or more"));
        }
        if self.inner == 1 && !self.n.is_multiple_of(self.channels) {
            return Err(invalid(format!("requant: {} outputs are not rows of {} channels", self.n, self.channels)));
        }
        if self.inner == 1 && self.acc_ld < self.channels || self.inner > 1 && self.acc_ld != self.channels {
            return Err(invalid(format!(
                "requant rows of {} accumulators for {} channels",
                self.acc_ld, self.channels
            )));
        }
        if !matches!(self.acc_elem, Elem::I32 | Elem::F32) {
            return Err(invalid(format!("requant accumulators of {:?}", self.acc_elem)));
        }
        let (out_code, out_scale, via_f16) = match self.out_kind {
            Int8Out::F32 => (Elem::F32.code(), 1.0, false),
            Int8Out::F16 => (Elem::F16.code(), 1.0, false),
            Int8Out::I8 { scale, via_f16 } if scale.is_finite() && scale > 0.0 => (Elem::I8.code(), scale, via_f16),
            Int8Out::I8 { scale, .. } => {
                return Err(invalid(format!("requant output scale {scale} is not positive")));
            }
        };
        let (residual, residual_code) = match self.residual {
            Some((p, e)) => {
                e.float_index("requant residual")?;
                (Some(p), e.code())
            }
            None => (None, 0),
        };
        let (act, lo, hi) = match self.act {
            Int8Act::None => (0, 0.0, 0.0),
            Int8Act::Relu => (1, 0.0, 0.0),
            Int8Act::Clip { lo, hi } => (2, lo, hi),
        };
        let (q_out, q_scale, q_via_f16) = match self.also_i8 {
            None => (None, 1.0, false),
            Some(_) if matches!(self.out_kind, Int8Out::I8 { .. }) => {
                return Err(invalid("requant: an INT8 copy of an INT8 output"));
            }
            Some((p, scale, via)) if scale.is_finite() && scale > 0.0 => (Some(p), scale, via),
            Some((_, scale, _)) => return Err(invalid(format!("requant copy scale {scale} is not positive"))),
        };
        if self.n == 0 {
            return Ok(None);
        }
        let args = vec![
            ptr(self.acc, "requant acc")?,
            KArg::I32(self.acc_elem.code()),
            KArg::I64(long(self.acc_ld, "requant acc_ld")?),
            ptr(self.out, "requant out")?,
            KArg::I32(out_code),
            ptr(self.alpha, "requant alpha")?,
            opt_ptr(self.bias, "requant bias")?,
            opt_ptr(residual, "requant residual")?,
            KArg::I32(residual_code),
            KArg::I64(long(self.n, "requant n")?),
            KArg::I32(int(self.channels, "requant channels")?),
            KArg::I64(long(self.inner, "requant inner")?),
            KArg::I32(act),
            KArg::F32(lo),
            KArg::F32(hi),
            KArg::F32(out_scale),
            KArg::I32(i32::from(via_f16)),
            opt_ptr(q_out, "requant INT8 copy")?,
            KArg::F32(q_scale),
            KArg::I32(i32::from(q_via_f16)),
        ];
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(self.n, THREADS), THREADS), args }))
    }
}

/// A depthwise NHWC INT8 convolution (`c` channels, one `r × s` filter each, stored
/// `[c, r, s]`) to INT32 accumulators `[n, p, q, c]`; symmetric padding.
#[derive(Debug, Clone, PartialEq)]
pub struct DwConvI8Args {
    pub x: DevPtr,
    pub w: DevPtr,
    pub y: DevPtr,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w_in: usize,
    pub out: [usize; 2],
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub pads: [usize; 2],
    pub dilations: [usize; 2],
}

impl DwConvI8Args {
    /// Elements of x and y.
    pub fn lens(&self) -> [usize; 2] {
        [self.n * self.h * self.w_in * self.c, self.n * self.out[0] * self.out[1] * self.c]
    }

    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        let dims = [self.c, self.h, self.w_in, self.kernel[0], self.kernel[1], self.strides[0], self.strides[1]];
        if dims.contains(&0) || self.dilations.contains(&0) {
            return Err(invalid(format!("depthwise INT8 convolution {self:?}: zero size, stride or dilation")));
        }
        let n_out = self.lens()[1];
        if n_out == 0 {
            return Ok(None);
        }
        let i = |v: usize, what: &str| int(v, what).map(KArg::I32);
        let args = vec![
            ptr(self.x, "dwconv x")?,
            ptr(self.w, "dwconv w")?,
            ptr(self.y, "dwconv y")?,
            KArg::I64(long(n_out, "dwconv outputs")?),
            i(self.c, "dwconv c")?,
            i(self.h, "dwconv h")?,
            i(self.w_in, "dwconv w")?,
            i(self.out[0], "dwconv p")?,
            i(self.out[1], "dwconv q")?,
            i(self.kernel[0], "dwconv r")?,
            i(self.kernel[1], "dwconv s")?,
            i(self.strides[0], "dwconv stride")?,
            i(self.strides[1], "dwconv stride")?,
            i(self.pads[0], "dwconv pad")?,
            i(self.pads[1], "dwconv pad")?,
            i(self.dilations[0], "dwconv dilation")?,
            i(self.dilations[1], "dwconv dilation")?,
        ];
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(n_out, THREADS), THREADS), args }))
    }

    /// CPU reference: exact integer sums.
    pub fn reference(&self, x: &[i8], w: &[i8]) -> Vec<i32> {
        let (c, h, wd) = (self.c, self.h, self.w_in);
        let ([p, q], [r, s]) = (self.out, self.kernel);
        let mut y = vec![0i32; self.lens()[1]];
        for (i, out) in y.iter_mut().enumerate() {
            let (ch, pix) = (i % c, i / c);
            let (ox, oy, b) = (pix % q, (pix / q) % p, pix / (p * q));
            for ky in 0..r {
                let Some(iy) = (oy * self.strides[0] + ky * self.dilations[0]).checked_sub(self.pads[0]) else {
                    continue;
                };
                if iy >= h {
                    continue;
                }
                for kx in 0..s {
                    let Some(ix) = (ox * self.strides[1] + kx * self.dilations[1]).checked_sub(self.pads[1]) else {
                        continue;
                    };
                    if ix >= wd {
                        continue;
                    }
                    *out += i32::from(x[((b * h + iy) * wd + ix) * c + ch]) * i32::from(w[(ch * r + ky) * s + kx]);
                }
            }
        }
        y
    }
}

impl Kernels {
    /// Depthwise INT8 convolution ([`DwConvI8Args`]).
    pub fn dwconv_i8(&self, stream: &CudaStream, args: &DwConvI8Args) -> Result<(), CudaError> {
        run(stream, &self.dwconv_i8, args.plan()?)
    }

    /// Activations into INT8 ([`QuantizeArgs`]).
    pub fn quantize(&self, stream: &CudaStream, args: &QuantizeArgs) -> Result<(), CudaError> {
        run(stream, &self.quantize, args.plan()?)
    }

    /// The epilogue of an INT8 layer ([`RequantArgs`]).
    pub fn requant(&self, stream: &CudaStream, args: &RequantArgs) -> Result<(), CudaError> {
        run(stream, &self.requant, args.plan()?)
    }
}

/// CPU reference of `kiln_quantize` (ONNX QuantizeLinear to INT8, zero point 0), rows of
/// `channels` values widened to rows of `padded` with zeros.
pub fn quantize_reference(x: &[f32], scale: f32, channels: usize, padded: usize) -> Vec<i8> {
    let mut out = Vec::with_capacity(x.len() / channels.max(1) * padded);
    for row in x.chunks(channels.max(1)) {
        out.extend(row.iter().map(|&v| kiln_engine::quant::int8::quantize(v, scale) as i8));
        out.resize(out.len() + padded.saturating_sub(row.len()), 0);
    }
    out
}

/// CPU reference of `kiln_requant`'s INT8 copy, from the FP32 values before the output's
/// own conversion (what [`requant_reference`] gives for [`Int8Out::F32`]).
pub fn requant_copy_reference(y: &[f32], scale: f32, via_f16: bool) -> Vec<i8> {
    y.iter()
        .map(|&v| {
            let v = if via_f16 { half::f16::from_f32(v).to_f32() } else { v };
            kiln_engine::quant::int8::quantize(v, scale) as i8
        })
        .collect()
}

/// How [`requant_reference`] reads its accumulators.
#[derive(Debug, Clone, Copy)]
pub struct AccLayout {
    /// Elements per channel index: 1 for channels-last, H·W for NCHW.
    pub inner: usize,
    /// Accumulators per row (channels-last only; ≥ the channel count).
    pub ld: usize,
}

/// CPU reference of `kiln_requant`, in the engine emulation's order of operations, for `n`
/// outputs. `acc` holds the accumulators already as f32 (INT32 sums rounded to nearest, as
/// `__int2float_rn` and cuDNN's conversion do).
pub fn requant_reference(
    acc: &[f32],
    layout: AccLayout,
    alpha: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    (act, out): (Int8Act, Int8Out),
    n: usize,
) -> Vec<f32> {
    let channels = alpha.len().max(1);
    let inner = layout.inner.max(1);
    (0..n)
        .map(|i| {
            let k = (i / inner) % channels;
            let a = if inner == 1 { acc[(i / channels) * layout.ld + k] } else { acc[i] };
            let mut y = a * alpha[k];
            if let Some(b) = bias {
                y += b[k];
            }
            if let Some(z) = residual {
                y += z[i];
            }
            y = match act {
                Int8Act::None => y,
                Int8Act::Relu => {
                    if y < 0.0 {
                        0.0
                    } else {
                        y
                    }
                }
                Int8Act::Clip { lo, hi } => {
                    if y < lo {
                        lo
                    } else if y > hi {
                        hi
                    } else {
                        y
                    }
                }
            };
            match out {
                Int8Out::F32 => y,
                Int8Out::F16 => half::f16::from_f32(y).to_f32(),
                Int8Out::I8 { scale, via_f16 } => {
                    let y = if via_f16 { half::f16::from_f32(y).to_f32() } else { y };
                    kiln_engine::quant::int8::quantize(y, scale) as f32
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_engine::graph::{Attr, Node};
    use kiln_engine::quant::int8::{NodeQuant, eval};
    use kiln_engine::{Tensor, TensorData};

    #[test]
    fn plans_validate_before_launching() -> Result<(), CudaError> {
        let q = QuantizeArgs { src: 256, src_elem: Elem::F16, dst: 512, n: 12, scale: 0.5, channels: 3, padded: 4 };
        assert!(q.plan()?.is_some());
        assert!(QuantizeArgs { n: 10, ..q.clone() }.plan().is_err(), "not whole rows");
        assert!(QuantizeArgs { padded: 2, ..q.clone() }.plan().is_err(), "padding narrower than the rows");
        assert_eq!(
            quantize_reference(&[0.5, -0.25, 100.0, 1.0, 0.26, f32::NAN], 0.5, 3, 4),
            [1, 0, 127, 0, 2, 1, 0, 0]
        );
        assert!(QuantizeArgs { scale: 0.0, ..q.clone() }.plan().is_err());
        assert!(QuantizeArgs { src_elem: Elem::I32, ..q.clone() }.plan().is_err());
        assert!(QuantizeArgs { n: 0, ..q }.plan()?.is_none());
        let r = RequantArgs {
            acc: 256,
            acc_elem: Elem::I32,
            acc_ld: 8,
            out: 512,
            out_kind: Int8Out::I8 { scale: 0.1, via_f16: true },
            alpha: 1024,
            bias: None,
            residual: Some((2048, Elem::F16)),
            n: 64,
            channels: 8,
            inner: 1,
            act: Int8Act::Clip { lo: 0.0, hi: 6.0 },
            also_i8: None,
        };
        let l = r.plan()?.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(l.args.len(), 20);
        assert!(RequantArgs { also_i8: Some((4096, 0.1, true)), ..r.clone() }.plan().is_err(), "copy of INT8");
        let f16_out = RequantArgs { out_kind: Int8Out::F16, ..r.clone() };
        assert!(RequantArgs { also_i8: Some((4096, 0.1, true)), ..f16_out.clone() }.plan()?.is_some());
        assert!(RequantArgs { also_i8: Some((4096, 0.0, true)), ..f16_out }.plan().is_err());
        assert!(RequantArgs { acc_ld: 7, ..r.clone() }.plan().is_err(), "rows narrower than the channels");
        assert!(RequantArgs { acc_elem: Elem::F16, ..r.clone() }.plan().is_err());
        assert!(RequantArgs { out_kind: Int8Out::I8 { scale: -1.0, via_f16: false }, ..r.clone() }.plan().is_err());
        assert!(RequantArgs { residual: Some((2048, Elem::I64)), ..r.clone() }.plan().is_err());
        assert!(RequantArgs { channels: 0, ..r.clone() }.plan().is_err());
        assert!(RequantArgs { acc: 0, ..r }.plan().is_err());
        Ok(())
    }

    /// The kernel's reference is the engine's INT8 emulation, step for step.
    #[test]
    fn requant_reference_is_the_engine_emulation() -> Result<(), String> {
        let (rows, k, cols) = (6, 40, 5);
        let mut rng = fastrand::Rng::with_seed(4);
        let a: Vec<f32> = (0..rows * k).map(|_| rng.f32() * 6.0 - 3.0).collect();
        let w: Vec<f32> = (0..k * cols).map(|_| rng.f32() - 0.5).collect();
        let bias: Vec<f32> = (0..cols).map(|_| rng.f32() - 0.5).collect();
        let node = Node::new("fc", "kiln.Dense", vec![Some(0), Some(1), Some(2)], vec![3])
            .with_attr("activation", Attr::String("relu".into()));
        let wt = Tensor::new(vec![k, cols], TensorData::F32(w.clone())).map_err(|e| e.to_string())?;
        let q =
            NodeQuant { input_scale: 3.0 / 127.0, weight_scales: kiln_engine::quant::int8::weight_scales(&node, &wt)? };
        let at = Tensor::new(vec![rows, k], TensorData::F32(a.clone())).map_err(|e| e.to_string())?;
        let bt = Tensor::new(vec![cols], TensorData::F32(bias.clone())).map_err(|e| e.to_string())?;
        let op = kiln_engine::ops::registry().get("kiln.Dense").ok_or("no Dense")?;
        let want = eval(&node, op, &[Some(&at), Some(&wt), Some(&bt)], &q)?;
        // The integer product as cuBLASLt computes it, then the kernel's reference.
        let qa = quantize_reference(&a, q.input_scale, k, k);
        let qw: Vec<i32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| (v / q.weight_scales[i % cols]).round_ties_even().clamp(-127.0, 127.0) as i32)
            .collect();
        let acc: Vec<f32> = (0..rows * cols)
            .map(|i| (0..k).map(|p| i32::from(qa[(i / cols) * k + p]) * qw[p * cols + i % cols]).sum::<i32>() as f32)
            .collect();
        let alpha: Vec<f32> = q.weight_scales.iter().map(|&s| q.input_scale * s).collect();
        let layout = AccLayout { inner: 1, ld: cols };
        let got =
            requant_reference(&acc, layout, &alpha, Some(&bias), None, (Int8Act::Relu, Int8Out::F32), rows * cols);
        let want = want.as_f32().ok_or("output")?;
        assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{got:?} vs {want:?}");
        Ok(())
    }
}
