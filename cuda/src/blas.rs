//! GEMMs through cuBLASLt: dense layers, stride-1 1×1 convolutions (an NHWC
//! activation is a row-major `[N·H·W, C]` matrix) and attention's batched
//! products, with bias, ReLU/GELU and the residual fused.
//!
//! Everything is decided at engine load, per (node, batch size): [`Blas::plan`]
//! builds the descriptors once and asks the heuristic for up to
//! [`MAX_ALGOS`] candidate algorithms, which the engine times to pick one.
//! [`Blas::run`] then only sets the bias pointer and enqueues the matmul —
//! no allocation, no heuristic — so it can be captured in a CUDA graph.
//!
//! Semantics are cuBLASLt's, column-major: `D = act(alpha·op(A)·op(B) +
//! beta·C + bias)`, with `bias` a vector of `m` elements (one per row of D) in
//! the output's element type. FP16 operands accumulate in FP32
//! (`CUBLAS_COMPUTE_32F`, FP32 scale type). FP32 operands also use plain
//! `CUBLAS_COMPUTE_32F`, not `_FAST_TF32`: FP32 nodes are FP32 because the
//! builder kept them exact, and they are checked against the FP32 reference.
//!
//! INT8 operands (INT8 layers) produce exact INT32 sums (`CUBLAS_COMPUTE_32I`,
//! INT32 alpha and beta): D is INT32 and nothing is fused — the requantising
//! kernel applies scales, bias, residual and activation. cuBLASLt's integer
//! kernels on ordinary (not COL32) layouts want the "TN" form (A transposed, B
//! not), m, k and every leading dimension a multiple of 4; [`GemmSpec::validate`]
//! checks that, and the lowering pads channels to satisfy it.

use std::fmt;

use cudarc::driver::CudaStream;

use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::blas::{self as lt, ComputeType, DataType, EpilogueKind, Heuristic, MatmulCall, MatrixLayout};

/// Most candidate algorithms a plan asks the heuristic for.
pub const MAX_ALGOS: usize = 8;

/// Default pointer alignment plans assume (bytes): the memory planner's offsets
/// and the weights' are multiples of 64, and 16 is what the fast kernels want.
pub const DEFAULT_ALIGN: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmElem {
    F16,
    F32,
    /// INT8 A and B, INT32 C and D.
    I8,
}

impl GemmElem {
    /// Bytes per A/B element.
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// Bytes per C/D element.
    pub fn out_size(self) -> usize {
        match self {
            Self::I8 => 4,
            other => other.size(),
        }
    }

    fn data_type(self) -> DataType {
        match self {
            Self::F16 => DataType::CUDA_R_16F,
            Self::F32 => DataType::CUDA_R_32F,
            Self::I8 => DataType::CUDA_R_8I,
        }
    }

    fn out_type(self) -> DataType {
        match self {
            Self::I8 => DataType::CUDA_R_32I,
            other => other.data_type(),
        }
    }

    /// Compute type and alpha/beta type.
    fn compute(self) -> (ComputeType, DataType) {
        match self {
            Self::I8 => (ComputeType::CUBLAS_COMPUTE_32I, DataType::CUDA_R_32I),
            _ => (ComputeType::CUBLAS_COMPUTE_32F, DataType::CUDA_R_32F),
        }
    }
}

/// The activation fused after the bias. cuBLASLt's GELU is the tanh
/// approximation (kiln's `gelu_tanh`), not the erf form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Epilogue {
    #[default]
    None,
    Relu,
    Gelu,
}

/// A strided batch: matrix `i` of each operand starts `i·stride` elements
/// after the first. A stride of 0 reuses one A or B for every product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmBatch {
    pub count: u64,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
}

/// One GEMM, column-major (see the module documentation). Leading dimensions
/// and strides are in elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmSpec {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub transa: bool,
    pub transb: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub batch: Option<GemmBatch>,
    pub elem: GemmElem,
    pub alpha: f32,
    /// 0, or 1 with C the residual (C may be a different buffer from D).
    pub beta: f32,
    /// A bias vector of `m` elements of `elem`.
    pub bias: bool,
    pub epilogue: Epilogue,
    /// Alignment (bytes, a power of two) that every A/B/C/D pointer given to
    /// [`Blas::run`] has; the heuristic only proposes algorithms that work with
    /// it, and `run` checks it.
    pub align_bytes: u32,
}

impl GemmSpec {
    /// Row-major `Y[M,N] = X[M,K]·W[K,N]` (kiln.Dense, W stored `[K,N]`), in
    /// cuBLASLt's column-major terms `Yᵀ = Wᵀ·Xᵀ`: m = N, n = M, k = K, A = W
    /// (lda = N), B = X (ldb = K), ldc = N, the bias per output channel (N).
    /// With `weights_t`, W is stored `[N,K]` (a 1×1 convolution's OHWI weights
    /// `[K_out, C_in]`): A is transposed and lda = K.
    ///
    /// So in [`GemmArgs`]: `a` = the weights, `b` = the activations, `d` = Y.
    pub fn row_major(m: u64, k: u64, n: u64, weights_t: bool, elem: GemmElem) -> Self {
        Self {
            m: n,
            n: m,
            k,
            transa: weights_t,
            transb: false,
            lda: (if weights_t { k } else { n }) as i64,
            ldb: k as i64,
            ldc: n as i64,
            batch: None,
            elem,
            alpha: 1.0,
            beta: 0.0,
            bias: false,
            epilogue: Epilogue::None,
            align_bytes: DEFAULT_ALIGN,
        }
    }

    /// `count` independent row-major products `Y_i[M,N] = X_i[M,K]·R_i[K,N]`
    /// over packed, contiguous batches (attention: `Q·Kᵀ` and `P·V` per batch
    /// and head). With `rhs_t`, each R is stored `[N,K]` (`Q·Kᵀ` from K stored
    /// `[Sk, D]`). As for [`GemmSpec::row_major`], `a` = R, `b` = X, `d` = Y.
    pub fn row_major_batched(count: u64, m: u64, k: u64, n: u64, rhs_t: bool, elem: GemmElem) -> Self {
        let batch = GemmBatch { count, stride_a: (k * n) as i64, stride_b: (m * k) as i64, stride_c: (m * n) as i64 };
        Self { batch: Some(batch), ..Self::row_major(m, k, n, rhs_t, elem) }
    }

    pub fn with_bias(self) -> Self {
        Self { bias: true, ..self }
    }

    pub fn with_epilogue(self, epilogue: Epilogue) -> Self {
        Self { epilogue, ..self }
    }

    /// Adds C (the residual) with beta = 1.
    pub fn with_residual(self) -> Self {
        Self { beta: 1.0, ..self }
    }

    pub fn with_alpha(self, alpha: f32) -> Self {
        Self { alpha, ..self }
    }

    /// Rows and columns of the stored A and B (before op()).
    fn stored_a(&self) -> (u64, u64) {
        if self.transa { (self.k, self.m) } else { (self.m, self.k) }
    }

    fn stored_b(&self) -> (u64, u64) {
        if self.transb { (self.n, self.k) } else { (self.k, self.n) }
    }

    /// Checks everything cuBLASLt would otherwise reject (or misread).
    pub fn validate(&self) -> Result<(), CudaError> {
        let bad = |why: String| Err(CudaError::InvalidArgument(format!("{self}: {why}")));
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return bad("m, n and k must be at least 1".into());
        }
        let ((ar, _), (br, _)) = (self.stored_a(), self.stored_b());
        for (name, ld, rows) in [("lda", self.lda, ar), ("ldb", self.ldb, br), ("ldc", self.ldc, self.m)] {
            if u64::try_from(ld).map_or(true, |ld| ld < rows) {
                return bad(format!("{name} {ld} is less than the {rows} rows it spans"));
            }
        }
        if !self.alpha.is_finite() || !self.beta.is_finite() {
            return bad("alpha and beta must be finite".into());
        }
        if !self.align_bytes.is_power_of_two() || (self.align_bytes as usize) < self.elem.out_size() {
            return bad(format!("alignment {} is not a power of two ≥ the element size", self.align_bytes));
        }
        if self.elem == GemmElem::I8 {
            if !self.transa || self.transb {
                return bad("INT8 GEMMs must be in TN form (A transposed, B not)".into());
            }
            if self.bias || self.epilogue != Epilogue::None || self.beta != 0.0 || self.alpha != 1.0 {
                return bad("INT8 GEMMs fuse nothing: alpha 1, no bias, residual or epilogue".into());
            }
            let dims = [self.m as i64, self.k as i64, self.lda, self.ldb, self.ldc];
            if dims.iter().any(|d| d % 4 != 0) {
                return bad("INT8 GEMMs need m, k and the leading dimensions to be multiples of 4".into());
            }
        }
        if let Some(b) = self.batch {
            if b.count == 0 || i32::try_from(b.count).is_err() {
                return bad(format!("batch count {} must be in 1..=2^31-1", b.count));
            }
            if b.stride_a < 0 || b.stride_b < 0 || b.stride_c < 0 {
                return bad("batch strides must not be negative".into());
            }
            // Outputs of different batches must not overlap.
            let d_span = self.ldc.saturating_mul(self.n as i64);
            if b.count > 1 && b.stride_c < d_span {
                return bad(format!("output batch stride {} is less than one output's {d_span} elements", b.stride_c));
            }
        }
        Ok(())
    }

    fn epilogue_kind(&self) -> EpilogueKind {
        match (self.epilogue, self.bias) {
            (Epilogue::None, false) => EpilogueKind::CUBLASLT_EPILOGUE_DEFAULT,
            (Epilogue::None, true) => EpilogueKind::CUBLASLT_EPILOGUE_BIAS,
            (Epilogue::Relu, false) => EpilogueKind::CUBLASLT_EPILOGUE_RELU,
            (Epilogue::Relu, true) => EpilogueKind::CUBLASLT_EPILOGUE_RELU_BIAS,
            (Epilogue::Gelu, false) => EpilogueKind::CUBLASLT_EPILOGUE_GELU,
            (Epilogue::Gelu, true) => EpilogueKind::CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }
}

impl fmt::Display for GemmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |x: bool| if x { 'T' } else { 'N' };
        write!(
            f,
            "GEMM {:?} m={} n={} k={} op=({},{}) lda={} ldb={} ldc={}",
            self.elem,
            self.m,
            self.n,
            self.k,
            t(self.transa),
            t(self.transb),
            self.lda,
            self.ldb,
            self.ldc
        )?;
        if let Some(b) = self.batch {
            write!(f, " batch={} strides=({},{},{})", b.count, b.stride_a, b.stride_b, b.stride_c)?;
        }
        if self.bias {
            f.write_str(" +bias")?;
        }
        if self.beta != 0.0 {
            write!(f, " +{}·C", self.beta)?;
        }
        if self.epilogue != Epilogue::None {
            write!(f, " {:?}", self.epilogue)?;
        }
        Ok(())
    }
}

/// Device pointers of one [`Blas::run`]. `c` is required when the spec's beta
/// is not 0 and may equal `d`; `bias` exactly when the spec has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GemmArgs {
    pub a: DevPtr,
    pub b: DevPtr,
    pub c: Option<DevPtr>,
    pub d: DevPtr,
    pub bias: Option<DevPtr>,
}

/// The descriptors of one GEMM and its candidate algorithms, best first.
///
/// `Send` but not `Sync`: [`Blas::run`] writes the bias pointer into the
/// descriptor, so a plan belongs to one execution context (build one per
/// context, or move it between threads, but never share it).
#[derive(Debug)]
pub struct GemmPlan {
    spec: GemmSpec,
    desc: lt::MatmulDesc,
    layouts: [MatrixLayout; 4],
    algos: Vec<Heuristic>,
    ids: Vec<String>,
}

impl GemmPlan {
    pub fn spec(&self) -> &GemmSpec {
        &self.spec
    }

    pub fn algo_count(&self) -> usize {
        self.algos.len()
    }

    /// A stable identifier of candidate `i` for timing caches (see
    /// [`crate::ffi::blas::algo_id`]: algorithm id, tile, stages, split-K,
    /// reduction, swizzle, custom option, inner and cluster shape), valid for
    /// one cuBLASLt version ([`Blas::version`]).
    pub fn algo_id(&self, i: usize) -> Option<&str> {
        self.ids.get(i).map(String::as_str)
    }

    pub fn algo_ids(&self) -> &[String] {
        &self.ids
    }

    /// Workspace candidate `i` needs (bytes).
    pub fn workspace_bytes(&self, i: usize) -> Option<usize> {
        self.algos.get(i).map(|h| h.workspaceSize)
    }

    /// The most workspace any candidate needs.
    pub fn max_workspace_bytes(&self) -> usize {
        self.algos.iter().map(|h| h.workspaceSize).max().unwrap_or(0)
    }
}

/// One cuBLASLt handle. It holds no stream or workspace, so one `Blas` serves
/// every execution context of an engine.
#[derive(Debug)]
pub struct Blas {
    handle: lt::Handle,
}

impl Blas {
    /// Opens cuBLASLt; [`CudaError::Unavailable`] when the library is missing.
    /// Call with the device's context current (as after `Device::open` on this thread).
    pub fn new() -> Result<Self, CudaError> {
        Ok(Self { handle: lt::Handle::create()? })
    }

    /// The loaded cuBLASLt's version, for timing-cache keys.
    pub fn version(&self) -> usize {
        lt::version()
    }

    /// Builds `spec`'s descriptors and asks the heuristic for up to
    /// [`MAX_ALGOS`] algorithms needing at most `workspace_bytes` each.
    pub fn plan(&self, spec: &GemmSpec, workspace_bytes: usize) -> Result<GemmPlan, CudaError> {
        spec.validate()?;
        let (dtype, out) = (spec.elem.data_type(), spec.elem.out_type());
        let (compute, scale) = spec.elem.compute();
        let desc = lt::MatmulDesc::new(compute, scale, spec.transa, spec.transb, spec.epilogue_kind())?;
        let batch = |stride: fn(&GemmBatch) -> i64| spec.batch.map(|b| (b.count as i32, stride(&b)));
        let ((ar, ac), (br, bc)) = (spec.stored_a(), spec.stored_b());
        let layouts = [
            MatrixLayout::new(dtype, ar, ac, spec.lda, batch(|b| b.stride_a))?,
            MatrixLayout::new(dtype, br, bc, spec.ldb, batch(|b| b.stride_b))?,
            // C and D get separate (identical) layouts so that the heuristic
            // does not assume an in-place result: C is often another buffer.
            MatrixLayout::new(out, spec.m, spec.n, spec.ldc, batch(|b| b.stride_c))?,
            MatrixLayout::new(out, spec.m, spec.n, spec.ldc, batch(|b| b.stride_c))?,
        ];
        let [a, b, c, d] = &layouts;
        let algos = lt::heuristics(&self.handle, &desc, [a, b, c, d], workspace_bytes, spec.align_bytes, MAX_ALGOS)
            .map_err(|e| CudaError::Blas(format!("no cuBLASLt algorithm for {spec} ({e})")))?;
        if algos.is_empty() {
            return Err(CudaError::Blas(format!(
                "no cuBLASLt algorithm supports {spec} within {workspace_bytes} bytes of workspace"
            )));
        }
        let ids = algos.iter().map(|h| lt::algo_id(&h.algo)).collect();
        Ok(GemmPlan { spec: *spec, desc, layouts, algos, ids })
    }

    /// Enqueues `plan` with candidate `algo` on `stream`. `workspace` must hold
    /// `workspace_bytes` ≥ [`GemmPlan::workspace_bytes`]`(algo)`.
    pub fn run(
        &self,
        stream: &CudaStream,
        plan: &GemmPlan,
        algo: usize,
        args: &GemmArgs,
        workspace: DevPtr,
        workspace_bytes: usize,
    ) -> Result<(), CudaError> {
        let spec = &plan.spec;
        let bad = |why: String| Err(CudaError::InvalidArgument(format!("{spec}: {why}")));
        let Some(h) = plan.algos.get(algo) else {
            return bad(format!("algorithm {algo} of {}", plan.algos.len()));
        };
        let c = match (args.c, spec.beta != 0.0) {
            (Some(c), true) => c,
            (None, false) => args.d,
            (None, true) => return bad("beta is not 0 but no C was given".into()),
            (Some(_), false) => return bad("C was given but beta is 0".into()),
        };
        let bias = match (args.bias, spec.bias) {
            (Some(p), true) => Some(p),
            (None, false) => None,
            (Some(_), false) => return bad("a bias pointer was given to a plan without bias".into()),
            (None, true) => return bad("the plan has a bias but no bias pointer was given".into()),
        };
        let align = u64::from(spec.align_bytes);
        for (name, p) in [("A", args.a), ("B", args.b), ("C", c), ("D", args.d)] {
            if p == 0 || !p.is_multiple_of(align) {
                return bad(format!("{name} pointer {p:#x} is null or not {align}-byte aligned"));
            }
        }
        if let Some(p) = bias
            && (p == 0 || !p.is_multiple_of(spec.elem.size() as u64))
        {
            return bad(format!("bias pointer {p:#x} is null or misaligned"));
        }
        if workspace_bytes < h.workspaceSize || (h.workspaceSize > 0 && workspace == 0) {
            return bad(format!(
                "algorithm {algo} needs {} bytes of workspace, got {workspace_bytes}",
                h.workspaceSize
            ));
        }
        stream.context().bind_to_thread().map_err(CudaError::driver("bind context for cuBLASLt"))?;
        if let Some(p) = bias {
            plan.desc.set_bias(p)?;
        }
        let [la, lb, lc, ld] = &plan.layouts;
        // The scale type decides how cuBLASLt reads alpha and beta: INT32 for INT8 GEMMs.
        let (alpha, beta) = match spec.elem {
            GemmElem::I8 => ((spec.alpha as i32).to_ne_bytes(), (spec.beta as i32).to_ne_bytes()),
            _ => (spec.alpha.to_ne_bytes(), spec.beta.to_ne_bytes()),
        };
        let call = MatmulCall {
            desc: &plan.desc,
            layouts: [la, lb, lc, ld],
            alpha,
            beta,
            a: args.a,
            b: args.b,
            c,
            d: args.d,
            algo: &h.algo,
            workspace,
            workspace_bytes,
        };
        lt::matmul(&self.handle, stream, &call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(spec: &GemmSpec) -> bool {
        matches!(spec.validate(), Err(CudaError::InvalidArgument(_)))
    }

    #[test]
    fn row_major_dense_maps_to_column_major() -> Result<(), CudaError> {
        // Y[64,256] = X[64,512]·W[512,256]
        let s = GemmSpec::row_major(64, 512, 256, false, GemmElem::F16);
        assert_eq!((s.m, s.n, s.k), (256, 64, 512));
        assert_eq!((s.transa, s.transb), (false, false));
        assert_eq!((s.lda, s.ldb, s.ldc), (256, 512, 256));
        assert_eq!((s.alpha, s.beta, s.bias, s.epilogue, s.batch), (1.0, 0.0, false, Epilogue::None, None));
        s.validate()?;
        // A 1×1 convolution over 8×7×7 pixels, 64 → 256 channels, OHWI weights [256, 64].
        let s = GemmSpec::row_major(8 * 7 * 7, 64, 256, true, GemmElem::F16);
        assert_eq!((s.m, s.n, s.k), (256, 392, 64));
        assert_eq!((s.transa, s.transb), (true, false));
        assert_eq!((s.lda, s.ldb, s.ldc), (64, 64, 256));
        s.validate()?;
        let s = s.with_bias().with_epilogue(Epilogue::Relu).with_residual();
        assert_eq!((s.bias, s.epilogue, s.beta), (true, Epilogue::Relu, 1.0));
        assert_eq!(s.epilogue_kind(), EpilogueKind::CUBLASLT_EPILOGUE_RELU_BIAS);
        assert_eq!(s.with_epilogue(Epilogue::Gelu).epilogue_kind(), EpilogueKind::CUBLASLT_EPILOGUE_GELU_BIAS);
        assert_eq!(
            GemmSpec::row_major(1, 1, 1, false, GemmElem::F32).epilogue_kind(),
            EpilogueKind::CUBLASLT_EPILOGUE_DEFAULT
        );
        Ok(())
    }

    #[test]
    fn batched_row_major_strides() -> Result<(), CudaError> {
        // Attention scores: 2·12 heads, Q[128,64]·Kᵀ with K stored [128,64].
        let s = GemmSpec::row_major_batched(24, 128, 64, 128, true, GemmElem::F16);
        assert_eq!((s.m, s.n, s.k), (128, 128, 64));
        assert_eq!((s.transa, s.lda, s.ldb, s.ldc), (true, 64, 64, 128));
        assert_eq!(s.batch, Some(GemmBatch { count: 24, stride_a: 128 * 64, stride_b: 128 * 64, stride_c: 128 * 128 }));
        s.validate()?;
        // Context: P[128,128]·V[128,64].
        let s = GemmSpec::row_major_batched(24, 128, 128, 64, false, GemmElem::F32);
        assert_eq!((s.m, s.n, s.k), (64, 128, 128));
        assert_eq!((s.transa, s.lda, s.ldb, s.ldc), (false, 64, 128, 64));
        assert_eq!(s.batch.map(|b| (b.stride_a, b.stride_b, b.stride_c)), Some((128 * 64, 128 * 128, 128 * 64)));
        s.validate()
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let ok = GemmSpec::row_major(4, 8, 16, false, GemmElem::F16);
        assert!(ok.validate().is_ok());
        assert!(invalid(&GemmSpec { k: 0, ..ok }));
        assert!(invalid(&GemmSpec { lda: 15, ..ok }));
        assert!(invalid(&GemmSpec { ldb: 7, ..ok }));
        assert!(invalid(&GemmSpec { ldc: -1, ..ok }));
        // Transposed A spans k rows: lda 8 is enough then.
        assert!(GemmSpec { transa: true, lda: 8, ..ok }.validate().is_ok());
        assert!(invalid(&GemmSpec { beta: f32::NAN, ..ok }));
        assert!(invalid(&GemmSpec { alpha: f32::INFINITY, ..ok }));
        assert!(invalid(&GemmSpec { align_bytes: 12, ..ok }));
        assert!(invalid(&GemmSpec { align_bytes: 2, elem: GemmElem::F32, ..ok }));
        let batched = GemmSpec::row_major_batched(3, 4, 8, 16, false, GemmElem::F16);
        assert!(batched.validate().is_ok());
        let with = |f: fn(&mut GemmBatch)| {
            let mut s = batched;
            if let Some(b) = s.batch.as_mut() {
                f(b);
            }
            s
        };
        assert!(invalid(&with(|b| b.count = 0)));
        assert!(invalid(&with(|b| b.count = 1 << 31)));
        assert!(invalid(&with(|b| b.stride_a = -1)));
        assert!(invalid(&with(|b| b.stride_c = 16)));
        // Broadcasting one weight matrix over the batch is fine.
        assert!(with(|b| b.stride_a = 0).validate().is_ok());
        let msg = GemmSpec { k: 0, ..ok.with_bias().with_epilogue(Epilogue::Gelu) }.validate();
        assert!(matches!(msg, Err(CudaError::InvalidArgument(m)) if m.contains("m=16 n=4 k=0") && m.contains("Gelu")));
    }

    #[test]
    fn blas_without_library_is_unavailable() {
        if crate::ffi::mem::cublaslt_present() {
            println!("skipped: cuBLASLt is present on this machine");
            return;
        }
        assert!(matches!(Blas::new(), Err(CudaError::Unavailable(_))));
    }
}
