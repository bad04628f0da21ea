//! cuDNN (legacy API): a handle bound to one stream, descriptors that destroy
//! themselves, the forward-algorithm query and the fused
//! `cudnnConvolutionBiasActivationForward` call.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cudnn::result::{self, CudnnError};
use cudarc::cudnn::sys;
use cudarc::driver::CudaStream;

pub use sys::cudnnActivationMode_t as ActivationMode;
pub use sys::cudnnConvolutionFwdAlgo_t as FwdAlgo;
pub use sys::cudnnDataType_t as DataType;
pub use sys::cudnnMathType_t as MathType;
pub use sys::cudnnTensorFormat_t as Format;

use crate::CudaError;
use crate::ffi::{DevPtr, mem};

fn err(what: &'static str) -> impl Fn(CudnnError) -> CudaError {
    move |e| CudaError::Dnn(format!("{what}: {:?}", e.0))
}

/// cuDNN's version (e.g. 91900), part of a timing-cache key.
pub fn version() -> usize {
    result::get_version()
}

/// `Ok` when libcudnn can be loaded: the check that keeps cudarc's lazy
/// loader (which panics) from ever running without it.
pub fn probe() -> Result<(), CudaError> {
    if mem::cudnn_present() {
        Ok(())
    } else {
        Err(CudaError::Unavailable("cuDNN 9 (libcudnn.so) not found on the library path".into()))
    }
}

/// A cuDNN handle bound to one stream. `Send` (a handle may move between
/// threads) but not `Sync`: cuDNN handles must not be used by two threads at once.
#[derive(Debug)]
pub struct Handle {
    raw: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

// SAFETY: see the type's documentation; the pointer is only destroyed in Drop.
unsafe impl Send for Handle {}

impl Handle {
    /// A handle in `stream`'s context, issuing all its work on `stream`;
    /// `CudaError::Unavailable` (not cudarc's panic) without libcudnn.
    pub fn create(stream: &Arc<CudaStream>) -> Result<Self, CudaError> {
        probe()?;
        // cudnnCreate initialises state on the current context.
        stream.context().bind_to_thread().map_err(CudaError::driver("bind context for cuDNN"))?;
        let raw = result::create_handle().map_err(err("create handle"))?;
        let handle = Self { raw, stream: stream.clone() };
        // SAFETY: `raw` is live and the stream outlives the handle (held in `self`).
        unsafe { result::set_stream(raw, stream.cu_stream().cast()) }.map_err(err("set stream"))?;
        Ok(handle)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created in `create`, destroyed only here. A failure cannot be
        // reported from Drop and leaves nothing to clean up.
        let _ = unsafe { result::destroy_handle(self.raw) };
    }
}

macro_rules! descriptor {
    ($(#[$doc:meta])* $name:ident, $raw:ty, $destroy:path) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name($raw);

        // SAFETY: immutable after construction; cuDNN only reads descriptors
        // during calls, so moving or sharing them between threads is fine.
        unsafe impl Send for $name {}
        // SAFETY: as above.
        unsafe impl Sync for $name {}

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created by this type's constructor, destroyed only here.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

descriptor!(
    /// A 4-D activation (or bias) tensor.
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    result::destroy_tensor_descriptor
);
descriptor!(
    /// Convolution weights.
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    result::destroy_filter_descriptor
);
descriptor!(
    /// Padding, strides, dilations, compute type, math type and groups.
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    result::destroy_convolution_descriptor
);
descriptor!(
    /// The activation the fused call applies.
    ActivationDesc,
    sys::cudnnActivationDescriptor_t,
    destroy_activation
);

/// cudarc's result module has no destroy for activation descriptors.
unsafe fn destroy_activation(desc: sys::cudnnActivationDescriptor_t) -> Result<(), CudnnError> {
    // SAFETY: forwarded from the caller (a live descriptor destroyed once).
    unsafe { sys::cudnnDestroyActivationDescriptor(desc) }.result()
}

fn int(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::InvalidArgument(format!("{what} {v} exceeds cuDNN's int range")))
}

fn ints<const N: usize>(v: [usize; N], what: &str) -> Result<[i32; N], CudaError> {
    let mut out = [0i32; N];
    for (o, x) in out.iter_mut().zip(v) {
        *o = int(x, what)?;
    }
    Ok(out)
}

impl TensorDesc {
    /// A packed tensor with logical dims `[n, c, h, w]`, stored as `format` says.
    pub fn new(format: Format, dtype: DataType, nchw: [usize; 4]) -> Result<Self, CudaError> {
        let dims = ints(nchw, "tensor dimension")?;
        let desc = Self(result::create_tensor_descriptor().map_err(err("create tensor descriptor"))?);
        // SAFETY: `desc.0` is live.
        unsafe { result::set_tensor4d_descriptor(desc.0, format, dtype, dims) }
            .map_err(err("set tensor descriptor"))?;
        Ok(desc)
    }
}

impl FilterDesc {
    /// Weights with logical dims `[k, c/groups, r, s]`; `format` NHWC means
    /// memory order K,R,S,C (OHWI), NCHW means K,C,R,S (OIHW).
    pub fn new(format: Format, dtype: DataType, kcrs: [usize; 4]) -> Result<Self, CudaError> {
        let dims = ints(kcrs, "filter dimension")?;
        let desc = Self(result::create_filter_descriptor().map_err(err("create filter descriptor"))?);
        // SAFETY: `desc.0` is live.
        unsafe { result::set_filter4d_descriptor(desc.0, dtype, format, dims) }
            .map_err(err("set filter descriptor"))?;
        Ok(desc)
    }
}

/// Geometry and numerics of a 2-D cross-correlation (what frameworks call convolution).
#[derive(Debug, Clone, Copy)]
pub struct ConvParams {
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub compute: DataType,
    pub math: MathType,
}

impl ConvDesc {
    pub fn new(p: &ConvParams) -> Result<Self, CudaError> {
        let [ph, pw] = ints(p.pad, "padding")?;
        let [sh, sw] = ints(p.stride, "stride")?;
        let [dh, dw] = ints(p.dilation, "dilation")?;
        let groups = int(p.groups, "group count")?;
        let desc = Self(result::create_convolution_descriptor().map_err(err("create convolution descriptor"))?);
        // SAFETY: `desc.0` is live for all three calls.
        unsafe {
            result::set_convolution2d_descriptor(
                desc.0,
                ph,
                pw,
                sh,
                sw,
                dh,
                dw,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                p.compute,
            )
        }
        .map_err(err("set convolution descriptor"))?;
        // SAFETY: as above.
        unsafe { result::set_convolution_math_type(desc.0, p.math) }.map_err(err("set convolution math type"))?;
        // SAFETY: as above.
        unsafe { result::set_convolution_group_count(desc.0, groups) }.map_err(err("set convolution group count"))?;
        Ok(desc)
    }

    /// The output dims `[n, k, p, q]` cuDNN computes for `x` and `w`, to check
    /// the engine's own shape arithmetic against.
    pub fn output_dims(&self, x: &TensorDesc, w: &FilterDesc) -> Result<[usize; 4], CudaError> {
        let mut d = [0i32; 4];
        let [n, c, h, wd] = &mut d;
        // SAFETY: all descriptors are live; the four outputs are valid ints.
        unsafe { sys::cudnnGetConvolution2dForwardOutputDim(self.0, x.0, w.0, n, c, h, wd) }
            .result()
            .map_err(err("convolution output dimensions"))?;
        let mut out = [0usize; 4];
        for (o, v) in out.iter_mut().zip(d) {
            *o = usize::try_from(v).map_err(|_| CudaError::Dnn(format!("negative output dimension {v}")))?;
        }
        Ok(out)
    }
}

impl ActivationDesc {
    /// `coef` is the clip ceiling of CLIPPED_RELU (ignored otherwise).
    pub fn new(mode: ActivationMode, coef: f64) -> Result<Self, CudaError> {
        let desc = Self(result::create_activation_descriptor().map_err(err("create activation descriptor"))?);
        // SAFETY: `desc.0` is live.
        unsafe {
            result::set_activation_descriptor(desc.0, mode, sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN, coef)
        }
        .map_err(err("set activation descriptor"))?;
        Ok(desc)
    }
}

/// One forward algorithm cuDNN proposes: the algorithm, its workspace and the
/// math type it was ranked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwdCandidate {
    pub algo: FwdAlgo,
    pub workspace_bytes: usize,
    pub math: MathType,
}

/// The forward algorithms `cudnnGetConvolutionForwardAlgorithm_v7` ranks
/// (heuristic, no GPU timing), best first, those with status SUCCESS only, each
/// algorithm once (v7 may list one under several math types), with the
/// workspace from `cudnnGetConvolutionForwardWorkspaceSize` for this descriptor.
pub fn forward_algorithms(
    handle: &Handle,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
) -> Result<Vec<FwdCandidate>, CudaError> {
    const COUNT: usize = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
    let mut perf: Vec<sys::cudnnConvolutionFwdAlgoPerf_t> = Vec::with_capacity(COUNT);
    let mut returned: i32 = 0;
    // SAFETY: descriptors are live; `perf` has room for COUNT results and cuDNN
    // writes `returned` ≤ COUNT of them.
    unsafe {
        result::get_convolution_forward_algorithm(
            handle.raw,
            x.0,
            w.0,
            conv.0,
            y.0,
            COUNT as i32,
            &mut returned,
            perf.as_mut_ptr(),
        )
    }
    .map_err(err("forward algorithm heuristic"))?;
    let returned = usize::try_from(returned).unwrap_or(0).min(COUNT);
    // SAFETY: the first `returned` elements were initialised by cuDNN.
    unsafe { perf.set_len(returned) };
    let mut out: Vec<FwdCandidate> = Vec::new();
    for p in perf {
        if p.status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS || out.iter().any(|c| c.algo == p.algo) {
            continue;
        }
        // An algorithm whose workspace cannot be sized for this descriptor is
        // not usable with it; skip it rather than fail the whole plan.
        // SAFETY: descriptors are live.
        let Ok(bytes) =
            (unsafe { result::get_convolution_forward_workspace_size(handle.raw, x.0, w.0, conv.0, y.0, p.algo) })
        else {
            continue;
        };
        out.push(FwdCandidate { algo: p.algo, workspace_bytes: bytes.max(p.memory), math: p.mathType });
    }
    Ok(out)
}

/// Workspace `algo` needs for these descriptors.
pub fn workspace_size(
    handle: &Handle,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
    algo: FwdAlgo,
) -> Result<usize, CudaError> {
    // SAFETY: descriptors are live.
    unsafe { result::get_convolution_forward_workspace_size(handle.raw, x.0, w.0, conv.0, y.0, algo) }
        .map_err(err("forward workspace size"))
}

/// y = act(y) in place on the handle's stream (`cudnnActivationForward`, which
/// allows x = y), for activations the fused call cannot apply. Host work only.
/// The caller guarantees `y` addresses a tensor `desc` describes.
pub fn activation_in_place(
    handle: &Handle,
    act: &ActivationDesc,
    desc: &TensorDesc,
    y: DevPtr,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: descriptors are live; alpha/beta are host f32 as cuDNN expects
    // for FP16 and FP32 data; `y` is the caller's contract above.
    unsafe {
        result::activation_forward(
            handle.raw,
            act.0,
            (&alpha as *const f32).cast(),
            desc.0,
            y as *const c_void,
            (&beta as *const f32).cast(),
            desc.0,
            y as *mut c_void,
        )
    }
    .map_err(err("activation"))
}

/// Descriptors and pointers of one fused convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvCall<'a> {
    pub x_desc: &'a TensorDesc,
    pub w_desc: &'a FilterDesc,
    pub conv: &'a ConvDesc,
    pub bias_desc: &'a TensorDesc,
    pub act: &'a ActivationDesc,
    pub y_desc: &'a TensorDesc,
    pub algo: FwdAlgo,
    pub x: DevPtr,
    pub w: DevPtr,
    pub bias: DevPtr,
    /// The residual (`y_desc`'s shape); equal to `y` when `alpha2` is 0.
    pub z: DevPtr,
    pub alpha2: f32,
    pub y: DevPtr,
    pub workspace: DevPtr,
    pub workspace_bytes: usize,
}

/// y = conv(x, w) (alpha 1, beta 0: y is not read) on the handle's stream — the INT8
/// convolution, whose FP32 sums the requantiser takes; `bias`, `act` and `z` of `call` are
/// not used. Host work only; the caller's guarantees are those of [`conv_bias_act`].
pub fn conv_forward(handle: &Handle, call: &ConvCall<'_>) -> Result<(), CudaError> {
    let (alpha, beta): (f32, f32) = (1.0, 0.0);
    // SAFETY: descriptors are live; the scaling factors are host f32, which cuDNN expects
    // for INT8 data with FP32 output; device pointers are the caller's contract.
    unsafe {
        result::convolution_forward(
            handle.raw,
            (&alpha as *const f32).cast(),
            call.x_desc.0,
            call.x as *const c_void,
            call.w_desc.0,
            call.w as *const c_void,
            call.conv.0,
            call.algo,
            call.workspace as *mut c_void,
            call.workspace_bytes,
            (&beta as *const f32).cast(),
            call.y_desc.0,
            call.y as *mut c_void,
        )
    }
    .map_err(err("convolution"))
}

/// y = act(conv(x, w) + alpha2·z + bias) on the handle's stream. Host work
/// only, so it can be captured in a CUDA graph. The caller guarantees that
/// the pointers address device memory of the sizes the descriptors describe
/// and that the workspace is large enough for `algo`; `crate::dnn` is where
/// that holds.
pub fn conv_bias_act(handle: &Handle, call: &ConvCall<'_>) -> Result<(), CudaError> {
    let alpha1: f32 = 1.0;
    // SAFETY: descriptors are live; the scaling factors are host f32, which
    // cuDNN expects for FP16 and FP32 data; device pointers are the caller's
    // contract above; `z` uses the output's descriptor (same shape and layout).
    unsafe {
        result::convolution_bias_activation_forward(
            handle.raw,
            (&alpha1 as *const f32).cast(),
            call.x_desc.0,
            call.x as *const c_void,
            call.w_desc.0,
            call.w as *const c_void,
            call.conv.0,
            call.algo,
            call.workspace as *mut c_void,
            call.workspace_bytes,
            (&call.alpha2 as *const f32).cast(),
            call.y_desc.0,
            call.z as *const c_void,
            call.bias_desc.0,
            call.bias as *const c_void,
            call.act.0,
            call.y_desc.0,
            call.y as *mut c_void,
        )
    }
    .map_err(err("convolution + bias + activation"))
}
