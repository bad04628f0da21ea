//! Convolutions through cuDNN's fused `cudnnConvolutionBiasActivationForward`:
//! `y = act(conv(x, w) + bias + z)` in one call, NHWC (FP16, the default of
//! kiln's NHWC regions) or NCHW.
//!
//! As for GEMMs, [`Dnn::plan`] builds every descriptor once per (node, batch
//! size) and lists the candidate algorithms (`cudnnGetConvolutionForwardAlgorithm_v7`,
//! cuDNN's heuristic ranking; the engine times them itself, as
//! `cudnnFindConvolutionForwardAlgorithmEx` would but against its timing
//! cache); [`Dnn::run`] only enqueues the call, so it can be captured in a
//! CUDA graph.
//!
//! Numerics: FP16 data with FP32 compute and tensor-op math; FP32 data with
//! `CUDNN_FMA_MATH`, which keeps cuDNN off TF32 tensor cores
//! (`CUDNN_DEFAULT_MATH` permits TF32 for FP32 data since cuDNN 8), so FP32
//! nodes stay exact against the reference.
//!
//! INT8 (INT8 layers): x and w INT8 NHWC with INT32 compute, y FP32 — cuDNN's
//! "INT8_EXT" configuration, which needs input and output channels in multiples
//! of 4 (the lowering pads them) — through plain `cudnnConvolutionForward`
//! (alpha 1, beta 0: y is not read, so stale arena bytes cannot leak in), not
//! the fused call: y is the exact INT32 sum rounded to FP32 and the requantising
//! kernel does the rest. Integer products are exact on tensor cores, so INT8
//! plans ask for tensor-op math.
//!
//! Limitations of the fused call: it is only relied on for ReLU and the
//! identity (TensorFlow and oneDNN pass it nothing else and apply other
//! activations separately), so `ClippedRelu(c)` runs the fused call with ReLU and
//! then clips at `c` in place with `cudnnActivationForward` — a second pass
//! over y, still one [`Dnn::run`]. With the identity activation it only runs
//! `CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM`, so such plans have that
//! one candidate; padding is symmetric (asymmetric ONNX pads must be
//! materialised first); the bias is required (pass zeros when a node has none).
//! The v7 heuristic ranks algorithms for the plain convolution, and the fused
//! call may still refuse some of them at run time (`CudaError::Dnn` naming
//! the status): tactic timing must skip those. IMPLICIT_PRECOMP_GEMM, the one
//! algorithm the fused call documents for every configuration, is therefore
//! always candidate 0, so the untimed choice (candidate 0) runs.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::dnn::{
    self as cd, ActivationDesc, ActivationMode, ConvCall, ConvDesc, ConvParams, DataType, FilterDesc, Format, FwdAlgo,
    FwdCandidate, MathType, TensorDesc,
};

/// Memory layout of activations; weights follow it (NHWC → OHWI, NCHW → OIHW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvLayout {
    Nhwc,
    Nchw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvElem {
    F16,
    F32,
    /// INT8 x and w, FP32 y, bias and z.
    I8,
}

impl ConvElem {
    /// Bytes per x/w element.
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// Bytes per y/bias/z element.
    pub fn out_size(self) -> usize {
        match self {
            Self::I8 => 4,
            other => other.size(),
        }
    }
}

/// The activation the fused call applies. `ClippedRelu(c)` is `min(max(x, 0), c)`:
/// kiln's `clip` activation with `clip_min` 0 (ReLU6 is `ClippedRelu(6.0)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvAct {
    Identity,
    Relu,
    ClippedRelu(f64),
}

/// One 2-D convolution with concrete shapes: input `[n, c, h, w]` (logical
/// dims; stored as `layout` says), `k` filters of `r × s` over `c / groups`
/// channels each, symmetric padding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvSpec {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub r: usize,
    pub s: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dil_h: usize,
    pub dil_w: usize,
    pub groups: usize,
    pub layout: ConvLayout,
    pub elem: ConvElem,
    pub act: ConvAct,
    /// Adds `z` (the output's shape) before the activation.
    pub residual: bool,
}

impl ConvSpec {
    /// A spec with stride 1, no padding or dilation, one group, identity, no residual.
    pub fn new(nchw: [usize; 4], k: usize, rs: [usize; 2], layout: ConvLayout, elem: ConvElem) -> Self {
        let [n, c, h, w] = nchw;
        let [r, s] = rs;
        Self {
            n,
            c,
            h,
            w,
            k,
            r,
            s,
            pad_h: 0,
            pad_w: 0,
            stride_h: 1,
            stride_w: 1,
            dil_h: 1,
            dil_w: 1,
            groups: 1,
            layout,
            elem,
            act: ConvAct::Identity,
            residual: false,
        }
    }

    /// Output height and width.
    pub fn output_hw(&self) -> Result<(usize, usize), CudaError> {
        let axis = |name: &str, size: usize, k: usize, pad: usize, stride: usize, dil: usize| {
            if k == 0 || stride == 0 || dil == 0 {
                return Err(self.invalid(format!("{name}: kernel, stride and dilation must be at least 1")));
            }
            let span = (k - 1).checked_mul(dil).and_then(|v| v.checked_add(1));
            let padded = pad.checked_mul(2).and_then(|p| p.checked_add(size));
            match (span, padded) {
                (Some(span), Some(padded)) if padded >= span => Ok((padded - span) / stride + 1),
                _ => Err(self.invalid(format!("{name}: the kernel spans more than the padded input"))),
            }
        };
        Ok((
            axis("height", self.h, self.r, self.pad_h, self.stride_h, self.dil_h)?,
            axis("width", self.w, self.s, self.pad_w, self.stride_w, self.dil_w)?,
        ))
    }

    /// Elements of x, w (`k · c/groups · r · s`) and y.
    pub fn lens(&self) -> Result<[usize; 3], CudaError> {
        let (p, q) = self.output_hw()?;
        let cg = self.c / self.groups.max(1);
        let prod = |v: &[usize]| v.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        match (
            prod(&[self.n, self.c, self.h, self.w]),
            prod(&[self.k, cg, self.r, self.s]),
            prod(&[self.n, self.k, p, q]),
        ) {
            (Some(x), Some(w), Some(y)) => Ok([x, w, y]),
            _ => Err(self.invalid("tensor sizes overflow".into())),
        }
    }

    fn invalid(&self, why: String) -> CudaError {
        CudaError::InvalidArgument(format!("{self:?}: {why}"))
    }

    /// Checks everything cuDNN would otherwise reject with a bare status.
    pub fn validate(&self) -> Result<(), CudaError> {
        if [self.n, self.c, self.h, self.w, self.k].contains(&0) {
            return Err(self.invalid("n, c, h, w and k must be at least 1".into()));
        }
        if self.groups == 0 || !self.c.is_multiple_of(self.groups) || !self.k.is_multiple_of(self.groups) {
            return Err(self.invalid(format!("{} groups must divide c = {} and k = {}", self.groups, self.c, self.k)));
        }
        if let ConvAct::ClippedRelu(c) = self.act
            && !(c.is_finite() && c > 0.0)
        {
            return Err(self.invalid(format!("clipped ReLU ceiling {c} must be finite and positive")));
        }
        if self.elem == ConvElem::I8
            && (self.layout != ConvLayout::Nhwc
                || self.groups != 1
                || !self.c.is_multiple_of(4)
                || !self.k.is_multiple_of(4)
                || self.act != ConvAct::Identity
                || self.residual)
        {
            return Err(self.invalid(
                "INT8 convolutions are NHWC, ungrouped, 4·n input and output channels, identity, no residual".into(),
            ));
        }
        let [x, w, y] = self.lens()?;
        if [x, w, y].iter().any(|&v| i32::try_from(v).is_err()) {
            return Err(self.invalid("tensors of 2^31 elements or more are beyond cuDNN's 4-D descriptors".into()));
        }
        Ok(())
    }

    fn format(&self) -> Format {
        match self.layout {
            ConvLayout::Nhwc => Format::CUDNN_TENSOR_NHWC,
            ConvLayout::Nchw => Format::CUDNN_TENSOR_NCHW,
        }
    }

    /// x/w data type, y/bias data type, compute type, math type.
    fn numerics(&self) -> (DataType, DataType, DataType, MathType) {
        let (half, float, int8) = (DataType::CUDNN_DATA_HALF, DataType::CUDNN_DATA_FLOAT, DataType::CUDNN_DATA_INT8);
        match self.elem {
            ConvElem::F16 => (half, half, float, MathType::CUDNN_TENSOR_OP_MATH),
            ConvElem::F32 => (float, float, float, MathType::CUDNN_FMA_MATH),
            ConvElem::I8 => (int8, float, DataType::CUDNN_DATA_INT32, MathType::CUDNN_TENSOR_OP_MATH),
        }
    }
}

/// Device pointers of one [`Dnn::run`]. `bias` (k elements) is required by
/// cuDNN; `z` exactly when the spec has a residual (it may equal `y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvArgs {
    pub x: DevPtr,
    pub w: DevPtr,
    pub bias: DevPtr,
    pub z: Option<DevPtr>,
    pub y: DevPtr,
}

/// The descriptors of one convolution and its candidate algorithms, best
/// first. Immutable, so one plan may serve every execution context.
#[derive(Debug)]
pub struct ConvPlan {
    spec: ConvSpec,
    x: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    y: TensorDesc,
    bias: TensorDesc,
    act: ActivationDesc,
    /// CLIPPED_RELU applied after the fused call (which applies ReLU first).
    clip: Option<ActivationDesc>,
    algos: Vec<FwdCandidate>,
}

impl ConvPlan {
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// Candidates: IMPLICIT_PRECOMP_GEMM first, then the heuristic's ranking.
    pub fn algo_count(&self) -> usize {
        self.algos.len()
    }

    /// Candidate `i`'s name for timing caches, e.g. `IMPLICIT_PRECOMP_GEMM`.
    pub fn algo_id(&self, i: usize) -> Option<&'static str> {
        self.algos.get(i).map(|a| algo_name(a.algo))
    }

    pub fn workspace_bytes(&self, i: usize) -> Option<usize> {
        self.algos.get(i).map(|a| a.workspace_bytes)
    }

    pub fn max_workspace_bytes(&self) -> usize {
        self.algos.iter().map(|a| a.workspace_bytes).max().unwrap_or(0)
    }
}

/// The algorithm's name without cuDNN's `CUDNN_CONVOLUTION_FWD_ALGO_` prefix.
pub fn algo_name(algo: FwdAlgo) -> &'static str {
    match algo {
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => "IMPLICIT_GEMM",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => "IMPLICIT_PRECOMP_GEMM",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM => "GEMM",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => "DIRECT",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT => "FFT",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => "FFT_TILING",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => "WINOGRAD",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => "WINOGRAD_NONFUSED",
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_COUNT => "COUNT",
    }
}

/// One cuDNN handle, bound to one stream (one per execution context).
#[derive(Debug)]
pub struct Dnn {
    handle: cd::Handle,
}

impl Dnn {
    /// `Ok` when cuDNN can be loaded; [`Dnn::new`] checks this first.
    pub fn available() -> Result<(), CudaError> {
        cd::probe()
    }

    /// Opens cuDNN on `stream`; [`CudaError::Unavailable`] when the library is missing.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self, CudaError> {
        Ok(Self { handle: cd::Handle::create(stream)? })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        self.handle.stream()
    }

    /// The loaded cuDNN's version, for timing-cache keys.
    pub fn version(&self) -> usize {
        cd::version()
    }

    /// Builds `spec`'s descriptors and lists its candidate algorithms.
    pub fn plan(&self, spec: &ConvSpec) -> Result<ConvPlan, CudaError> {
        spec.validate()?;
        let (p, q) = spec.output_hw()?;
        let (data, out, compute, math) = spec.numerics();
        let format = spec.format();
        let x = TensorDesc::new(format, data, [spec.n, spec.c, spec.h, spec.w])?;
        let w = FilterDesc::new(format, data, [spec.k, spec.c / spec.groups, spec.r, spec.s])?;
        let conv = ConvDesc::new(&ConvParams {
            pad: [spec.pad_h, spec.pad_w],
            stride: [spec.stride_h, spec.stride_w],
            dilation: [spec.dil_h, spec.dil_w],
            groups: spec.groups,
            compute,
            math,
        })?;
        let dims = conv.output_dims(&x, &w)?;
        if dims != [spec.n, spec.k, p, q] {
            return Err(CudaError::Dnn(format!(
                "{spec:?}: cuDNN computes output {dims:?}, kiln [{}, {}, {p}, {q}]",
                spec.n, spec.k
            )));
        }
        let y = TensorDesc::new(format, out, [spec.n, spec.k, p, q])?;
        let bias = TensorDesc::new(format, out, [1, spec.k, 1, 1])?;
        let (act, clip) = match spec.act {
            ConvAct::Identity => (ActivationDesc::new(ActivationMode::CUDNN_ACTIVATION_IDENTITY, 0.0)?, None),
            ConvAct::Relu => (ActivationDesc::new(ActivationMode::CUDNN_ACTIVATION_RELU, 0.0)?, None),
            ConvAct::ClippedRelu(c) => (
                ActivationDesc::new(ActivationMode::CUDNN_ACTIVATION_RELU, 0.0)?,
                Some(ActivationDesc::new(ActivationMode::CUDNN_ACTIVATION_CLIPPED_RELU, c)?),
            ),
        };
        let mut algos = cd::forward_algorithms(&self.handle, &x, &w, &conv, &y)?;
        let precomp = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
        // The fused call runs only IMPLICIT_PRECOMP_GEMM with the identity; INT8 uses the plain call.
        if spec.act == ConvAct::Identity && spec.elem != ConvElem::I8 {
            algos.retain(|a| a.algo == precomp);
        }
        match algos.iter().position(|a| a.algo == precomp) {
            Some(i) => algos[..=i].rotate_right(1),
            // Not ranked: it may still run (cuDNN checks at the call), and it is
            // the fused call's safe default.
            None => {
                if let Ok(workspace_bytes) = cd::workspace_size(&self.handle, &x, &w, &conv, &y, precomp) {
                    algos.insert(0, FwdCandidate { algo: precomp, workspace_bytes, math });
                }
            }
        }
        if algos.is_empty() {
            return Err(CudaError::Dnn(format!("no cuDNN forward algorithm supports {spec:?}")));
        }
        Ok(ConvPlan { spec: *spec, x, w, conv, y, bias, act, clip, algos })
    }

    /// Enqueues `plan` with candidate `algo` on this handle's stream.
    /// `workspace` must hold `workspace_bytes` ≥ [`ConvPlan::workspace_bytes`]`(algo)`.
    /// A candidate other than 0 may be refused by cuDNN (`CudaError::Dnn`);
    /// see the module documentation.
    pub fn run(
        &self,
        plan: &ConvPlan,
        algo: usize,
        args: &ConvArgs,
        workspace: DevPtr,
        workspace_bytes: usize,
    ) -> Result<(), CudaError> {
        let spec = &plan.spec;
        let bad = |why: String| Err(CudaError::InvalidArgument(format!("{spec:?}: {why}")));
        let Some(cand) = plan.algos.get(algo) else {
            return bad(format!("algorithm {algo} of {}", plan.algos.len()));
        };
        let (z, alpha2) = match (args.z, spec.residual) {
            (Some(z), true) => (z, 1.0),
            // z only enters as alpha2·z, so with alpha2 = 0 any valid address of
            // the output's shape will do (the GPU tests poison y to check that
            // it is not read).
            (None, false) => (args.y, 0.0),
            (None, true) => return bad("the plan adds a residual but no z was given".into()),
            (Some(_), false) => return bad("z was given to a plan without residual".into()),
        };
        let (size, out) = (spec.elem.size() as u64, spec.elem.out_size() as u64);
        for (name, p, size) in
            [("x", args.x, size), ("w", args.w, size), ("bias", args.bias, out), ("z", z, out), ("y", args.y, out)]
        {
            if p == 0 || !p.is_multiple_of(size) {
                return bad(format!("{name} pointer {p:#x} is null or misaligned"));
            }
        }
        if workspace_bytes < cand.workspace_bytes || (cand.workspace_bytes > 0 && workspace == 0) {
            return bad(format!(
                "algorithm {} needs {} bytes of workspace, got {workspace_bytes}",
                algo_name(cand.algo),
                cand.workspace_bytes
            ));
        }
        self.handle.stream().context().bind_to_thread().map_err(CudaError::driver("bind context for cuDNN"))?;
        let call = ConvCall {
            x_desc: &plan.x,
            w_desc: &plan.w,
            conv: &plan.conv,
            bias_desc: &plan.bias,
            act: &plan.act,
            y_desc: &plan.y,
            algo: cand.algo,
            x: args.x,
            w: args.w,
            bias: args.bias,
            z,
            alpha2,
            y: args.y,
            workspace,
            workspace_bytes,
        };
        if spec.elem == ConvElem::I8 {
            return cd::conv_forward(&self.handle, &call);
        }
        cd::conv_bias_act(&self.handle, &call)?;
        match &plan.clip {
            Some(clip) => cd::activation_in_place(&self.handle, clip, &plan.y, args.y),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(h: usize, r: usize, pad: usize, stride: usize) -> ConvSpec {
        ConvSpec {
            pad_h: pad,
            pad_w: pad,
            stride_h: stride,
            stride_w: stride,
            ..ConvSpec::new([2, 8, h, h], 16, [r, r], ConvLayout::Nhwc, ConvElem::F16)
        }
    }

    fn invalid(s: &ConvSpec) -> bool {
        matches!(s.validate(), Err(CudaError::InvalidArgument(_)))
    }

    #[test]
    fn output_sizes() -> Result<(), CudaError> {
        // ResNet stem: 224, 7×7, pad 3, stride 2 → 112.
        assert_eq!(spec(224, 7, 3, 2).output_hw()?, (112, 112));
        assert_eq!(spec(56, 3, 1, 1).output_hw()?, (56, 56));
        assert_eq!(spec(56, 1, 0, 2).output_hw()?, (28, 28));
        assert_eq!(spec(7, 7, 0, 1).output_hw()?, (1, 1));
        // Dilation 2 makes a 3×3 span 5.
        assert_eq!(ConvSpec { dil_h: 2, dil_w: 2, ..spec(10, 3, 0, 1) }.output_hw()?, (6, 6));
        // Different height and width geometry.
        let s = ConvSpec { h: 9, w: 16, pad_w: 2, stride_h: 2, ..spec(1, 3, 0, 1) };
        assert_eq!(s.output_hw()?, (4, 18));
        let s = spec(14, 3, 1, 1);
        assert_eq!(s.lens()?, [2 * 8 * 14 * 14, 16 * 8 * 9, 2 * 16 * 14 * 14]);
        let dw = ConvSpec { groups: 8, k: 8, ..s };
        assert_eq!(dw.lens()?[1], 8 * 9);
        Ok(())
    }

    #[test]
    fn validation_rejects_bad_specs() {
        assert!(spec(14, 3, 1, 1).validate().is_ok());
        assert!(invalid(&spec(2, 7, 0, 1)), "kernel larger than the input");
        assert!(invalid(&spec(14, 3, 1, 0)), "stride 0");
        assert!(invalid(&ConvSpec { dil_w: 0, ..spec(14, 3, 1, 1) }));
        assert!(invalid(&ConvSpec { n: 0, ..spec(14, 3, 1, 1) }));
        assert!(invalid(&ConvSpec { groups: 0, ..spec(14, 3, 1, 1) }));
        assert!(invalid(&ConvSpec { groups: 3, ..spec(14, 3, 1, 1) }), "3 does not divide 8 channels");
        assert!(invalid(&ConvSpec { groups: 8, k: 12, ..spec(14, 3, 1, 1) }), "8 does not divide 12 filters");
        assert!(ConvSpec { groups: 8, k: 8, ..spec(14, 3, 1, 1) }.validate().is_ok());
        assert!(invalid(&ConvSpec { act: ConvAct::ClippedRelu(0.0), ..spec(14, 3, 1, 1) }));
        assert!(invalid(&ConvSpec { act: ConvAct::ClippedRelu(f64::NAN), ..spec(14, 3, 1, 1) }));
        assert!(ConvSpec { act: ConvAct::ClippedRelu(6.0), ..spec(14, 3, 1, 1) }.validate().is_ok());
        assert!(invalid(&ConvSpec { n: 1 << 20, c: 1 << 12, ..spec(14, 3, 1, 1) }), "beyond i32 elements");
        assert!(invalid(&ConvSpec { pad_h: usize::MAX, ..spec(14, 3, 1, 1) }), "overflowing padding");
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(algo_name(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM), "IMPLICIT_PRECOMP_GEMM");
        assert_eq!(algo_name(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED), "WINOGRAD_NONFUSED");
    }

    #[test]
    fn dnn_without_library_is_unavailable() {
        if crate::ffi::mem::cudnn_present() {
            println!("skipped: cuDNN is present on this machine");
            return;
        }
        // No stream exists without a driver, so this checks the probe `Dnn::new`
        // runs before any cuDNN call.
        assert!(matches!(Dnn::available(), Err(CudaError::Unavailable(_))));
    }
}
