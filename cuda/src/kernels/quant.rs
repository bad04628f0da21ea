//! `kernels/cu/quant.cu`: activations into INT8 ([`QuantizeArgs`]) and the requantising
//! epilogue of INT8 layers ([`RequantArgs`]), with their CPU references — the same
//! arithmetic as the engine's INT8 emulation (`kiln_engine::quant::int8`).

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, opt_ptr, ptr, run, stride_blocks};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

const THREADS: u32 = 256;

/// Output code of INT8 in `quant.cu` (FP32 0 and FP16 1 share [`Elem::code`]).
const I8_CODE: i32 = 5;

/// `n` FP32 or FP16 values at `src` to INT8 at `dst` with one scale.
#[derive(Debug, Clone)]
pub struct QuantizeArgs {
    pub src: DevPtr,
    pub src_elem: Elem,
    pub dst: DevPtr,
    pub n: usize,
    pub scale: f32,
}

impl QuantizeArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        self.src_elem.float_index("quantize source")?;
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(invalid(format!("quantize scale {} must be finite and positive", self.scale)));
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

/// `n` INT32 accumulators to the layer's output: `acc·alpha[k] + bias[k] + residual`,
/// the activation, then the output type; `k = (i / inner) % channels`.
#[derive(Debug, Clone)]
pub struct RequantArgs {
    pub acc: DevPtr,
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
}

impl RequantArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        if self.channels == 0 || self.inner == 0 {
            return Err(invalid("requant needs at least one channel and inner = 1 or more"));
        }
        let (out_code, out_scale, via_f16) = match self.out_kind {
            Int8Out::F32 => (Elem::F32.code(), 1.0, false),
            Int8Out::F16 => (Elem::F16.code(), 1.0, false),
            Int8Out::I8 { scale, via_f16 } if scale.is_finite() && scale > 0.0 => (I8_CODE, scale, via_f16),
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
        if self.n == 0 {
            return Ok(None);
        }
        let args = vec![
            ptr(self.acc, "requant acc")?,
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
        ];
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(self.n, THREADS), THREADS), args }))
    }
}

impl Kernels {
    /// Activations into INT8 ([`QuantizeArgs`]).
    pub fn quantize(&self, stream: &CudaStream, args: &QuantizeArgs) -> Result<(), CudaError> {
        run(stream, &self.quantize, args.plan()?)
    }

    /// The epilogue of an INT8 layer ([`RequantArgs`]).
    pub fn requant(&self, stream: &CudaStream, args: &RequantArgs) -> Result<(), CudaError> {
        run(stream, &self.requant, args.plan()?)
    }
}

/// CPU reference of `kiln_quantize` (ONNX QuantizeLinear to INT8, zero point 0).
pub fn quantize_reference(x: &[f32], scale: f32) -> Vec<i8> {
    x.iter().map(|&v| kiln_engine::quant::int8::quantize(v, scale) as i8).collect()
}

/// CPU reference of `kiln_requant`, in the engine emulation's order of operations.
pub fn requant_reference(
    acc: &[i32],
    alpha: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    inner: usize,
    act: Int8Act,
    out: Int8Out,
) -> Vec<f32> {
    let channels = alpha.len().max(1);
    acc.iter()
        .enumerate()
        .map(|(i, &a)| {
            let k = (i / inner.max(1)) % channels;
            let mut y = a as f32 * alpha[k];
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
        let q = QuantizeArgs { src: 256, src_elem: Elem::F16, dst: 512, n: 10, scale: 0.5 };
        assert!(q.plan()?.is_some());
        assert!(QuantizeArgs { scale: 0.0, ..q.clone() }.plan().is_err());
        assert!(QuantizeArgs { src_elem: Elem::I32, ..q.clone() }.plan().is_err());
        assert!(QuantizeArgs { n: 0, ..q }.plan()?.is_none());
        let r = RequantArgs {
            acc: 256,
            out: 512,
            out_kind: Int8Out::I8 { scale: 0.1, via_f16: true },
            alpha: 1024,
            bias: None,
            residual: Some((2048, Elem::F16)),
            n: 64,
            channels: 8,
            inner: 1,
            act: Int8Act::Clip { lo: 0.0, hi: 6.0 },
        };
        let l = r.plan()?.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(l.args.len(), 15);
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
        let qa = quantize_reference(&a, q.input_scale);
        let qw: Vec<i32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| (v / q.weight_scales[i % cols]).round_ties_even().clamp(-127.0, 127.0) as i32)
            .collect();
        let acc: Vec<i32> = (0..rows * cols)
            .map(|i| (0..k).map(|p| i32::from(qa[(i / cols) * k + p]) * qw[p * cols + i % cols]).sum())
            .collect();
        let alpha: Vec<f32> = q.weight_scales.iter().map(|&s| q.input_scale * s).collect();
        let got = requant_reference(&acc, &alpha, Some(&bias), None, 1, Int8Act::Relu, Int8Out::F32);
        let want = want.as_f32().ok_or("output")?;
        assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{got:?} vs {want:?}");
        Ok(())
    }
}
