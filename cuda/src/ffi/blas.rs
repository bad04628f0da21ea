//! cuBLASLt: the handle, descriptors that destroy themselves, the heuristic
//! query and the matmul call. cudarc's safe `Matmul` rebuilds descriptors and
//! re-runs the heuristic on every call; the engine builds them once per
//! (node, batch size) and only calls [`matmul`] at run time.

use std::cell::Cell;
use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result::{self, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;

pub use sys::cublasComputeType_t as ComputeType;
pub use sys::cublasLtEpilogue_t as EpilogueKind;
pub use sys::cublasLtMatmulAlgo_t as Algo;
pub use sys::cublasLtMatmulHeuristicResult_t as Heuristic;
pub use sys::cudaDataType_t as DataType;

use crate::CudaError;
use crate::ffi::{DevPtr, mem};

fn err(what: &'static str) -> impl Fn(CublasError) -> CudaError {
    move |e| CudaError::Blas(format!("{what}: {:?}", e.0))
}

/// cuBLASLt's `CUBLAS_OP_N` / `CUBLAS_OP_T` (the enum is not in cudarc's cublaslt bindings).
fn op(transpose: bool) -> i32 {
    i32::from(transpose)
}

/// cuBLASLt's version (e.g. 130100), part of a timing-cache key: algorithm ids
/// are only comparable within one library version.
pub fn version() -> usize {
    // SAFETY: no arguments; the library was found by `Handle::create`'s probe.
    unsafe { sys::cublasLtGetVersion() }
}

/// One cuBLASLt handle. It holds no stream and no workspace (both are passed to
/// each [`matmul`]), and cuBLAS documents its handles as usable from several
/// host threads, hence `Send` and `Sync`.
#[derive(Debug)]
pub struct Handle(sys::cublasLtHandle_t);

// SAFETY: see the type's documentation; the pointer is only destroyed in Drop.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    /// Creates a handle; `CudaError::Unavailable` (not cudarc's panic) when
    /// libcublasLt cannot be loaded.
    pub fn create() -> Result<Self, CudaError> {
        if !mem::cublaslt_present() {
            return Err(CudaError::Unavailable("cuBLASLt (libcublasLt.so) not found on the library path".into()));
        }
        result::create_handle().map(Self).map_err(err("create handle"))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` and destroyed only here. A failure
        // cannot be reported from Drop and leaves nothing to clean up.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// A matmul descriptor: compute and scale types, transposes, epilogue, and the
/// bias pointer, which is written at run time (see [`MatmulDesc::set_bias`]).
/// Not `Sync`: the bias pointer is state in the descriptor.
#[derive(Debug)]
pub struct MatmulDesc {
    raw: sys::cublasLtMatmulDesc_t,
    bias: Cell<DevPtr>,
}

// SAFETY: the descriptor is plain host memory owned by this value; moving it to
// another thread is fine, sharing is not (no Sync, and `bias` is a Cell).
unsafe impl Send for MatmulDesc {}

impl MatmulDesc {
    pub fn new(
        compute: ComputeType,
        scale: DataType,
        transa: bool,
        transb: bool,
        epilogue: EpilogueKind,
    ) -> Result<Self, CudaError> {
        let raw = result::create_matmul_desc(compute, scale).map_err(err("create matmul descriptor"))?;
        let desc = Self { raw, bias: Cell::new(0) };
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op(transa))?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op(transb))?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
        Ok(desc)
    }

    /// `T` must be the attribute's C type (cuBLASLt checks the size).
    fn set<T: Copy>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<(), CudaError> {
        // SAFETY: `raw` is live; `value` points to `size_of::<T>()` readable bytes
        // that cuBLASLt copies before returning.
        unsafe { result::set_matmul_desc_attribute(self.raw, attr, (value as *const T).cast(), size_of::<T>()) }
            .map_err(err("set matmul descriptor attribute"))
    }

    /// Points the bias epilogue at `ptr`. Each execution context has its own
    /// buffers while the descriptor is per plan, so this is set before each
    /// matmul (a host-side write, skipped when unchanged).
    pub fn set_bias(&self, ptr: DevPtr) -> Result<(), CudaError> {
        if self.bias.get() == ptr {
            return Ok(());
        }
        self.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
        self.bias.set(ptr);
        Ok(())
    }
}

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { result::destroy_matmul_desc(self.raw) };
    }
}

/// A column-major matrix layout, optionally a strided batch.
#[derive(Debug)]
pub struct MatrixLayout(sys::cublasLtMatrixLayout_t);

// SAFETY: immutable after construction; cuBLASLt only reads it.
unsafe impl Send for MatrixLayout {}
// SAFETY: as above.
unsafe impl Sync for MatrixLayout {}

impl MatrixLayout {
    /// `rows × cols` of `dtype` with leading dimension `ld` (elements);
    /// `batch` = (count, stride between matrices in elements).
    pub fn new(dtype: DataType, rows: u64, cols: u64, ld: i64, batch: Option<(i32, i64)>) -> Result<Self, CudaError> {
        let layout = Self(result::create_matrix_layout(dtype, rows, cols, ld).map_err(err("create matrix layout"))?);
        if let Some((count, stride)) = batch {
            layout.set(sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count)?;
            layout.set(sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride)?;
        }
        Ok(layout)
    }

    fn set<T: Copy>(&self, attr: sys::cublasLtMatrixLayoutAttribute_t, value: &T) -> Result<(), CudaError> {
        // SAFETY: as `MatmulDesc::set`.
        unsafe { result::set_matrix_layout_attribute(self.0, attr, (value as *const T).cast(), size_of::<T>()) }
            .map_err(err("set matrix layout attribute"))
    }
}

impl Drop for MatrixLayout {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

/// Heuristic search preferences, only alive during [`heuristics`].
struct Preference(sys::cublasLtMatmulPreference_t);

impl Preference {
    fn set<T: Copy>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &T) -> Result<(), CudaError> {
        // SAFETY: as `MatmulDesc::set`.
        unsafe { result::set_matmul_pref_attribute(self.0, attr, (value as *const T).cast(), size_of::<T>()) }
            .map_err(err("set matmul preference"))
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created in `heuristics`, destroyed only here.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

/// Up to `max` candidate algorithms for `desc` over the layouts `[A, B, C, D]`,
/// best first, each needing at most `workspace_bytes` and working with pointers
/// aligned to `align_bytes`. Only results whose state is SUCCESS are kept.
pub fn heuristics(
    handle: &Handle,
    desc: &MatmulDesc,
    layouts: [&MatrixLayout; 4],
    workspace_bytes: usize,
    align_bytes: u32,
    max: usize,
) -> Result<Vec<Heuristic>, CudaError> {
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = Preference(result::create_matmul_pref().map_err(err("create matmul preference"))?);
    pref.set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(workspace_bytes as u64))?;
    for attr in [
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    ] {
        pref.set(attr, &align_bytes)?;
    }
    let requested = i32::try_from(max.clamp(1, 64)).unwrap_or(64);
    let mut found: Vec<Heuristic> = Vec::with_capacity(requested as usize);
    let mut returned: i32 = 0;
    let [a, b, c, d] = layouts;
    // SAFETY: every descriptor is live for the call; `found` has capacity for
    // `requested` results, cuBLASLt writes `returned` ≤ `requested` of them.
    unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(
            handle.0,
            desc.raw,
            a.0,
            b.0,
            c.0,
            d.0,
            pref.0,
            requested,
            found.as_mut_ptr(),
            &mut returned,
        )
    }
    .result()
    .map_err(err("algorithm heuristic"))?;
    let returned = usize::try_from(returned).unwrap_or(0).min(requested as usize);
    // SAFETY: cuBLASLt initialised the first `returned` elements (checked ≤ capacity).
    unsafe { found.set_len(returned) };
    found.retain(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    Ok(found)
}

/// A stable description of `algo` for timing caches: the algorithm id, tile,
/// stages, split-K, reduction scheme, CTA swizzling, custom option, inner and
/// cluster shape (`cublasLtMatmulAlgoConfigGetAttribute`), e.g.
/// `a21-t18-s15-k1-r0-w0-c0-i0-g0`. Stable for one cuBLASLt version. A field
/// the library cannot report reads `na`; if not even the id can be read, the
/// opaque algorithm bytes are used instead (`raw-<hex>`).
pub fn algo_id(algo: &Algo) -> String {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
    if algo_config(algo, C::CUBLASLT_ALGO_CONFIG_ID).is_err() {
        let hex: Vec<String> = algo.data.iter().map(|w| format!("{w:016x}")).collect();
        return format!("raw-{}", hex.join(""));
    }
    let fields = [
        ('a', C::CUBLASLT_ALGO_CONFIG_ID),
        ('t', C::CUBLASLT_ALGO_CONFIG_TILE_ID),
        ('s', C::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        ('k', C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        ('r', C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
        ('w', C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
        ('c', C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
        ('i', C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID),
        ('g', C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
    ];
    let parts: Vec<String> = fields
        .iter()
        .map(|&(tag, attr)| match algo_config(algo, attr) {
            Ok(v) => format!("{tag}{v}"),
            Err(_) => format!("{tag}na"),
        })
        .collect();
    parts.join("-")
}

/// One config attribute, whatever its C width (the attributes are 16- or
/// 32-bit): its size is asked first, then read into zeroed bytes.
fn algo_config(algo: &Algo, attr: sys::cublasLtMatmulAlgoConfigAttributes_t) -> Result<i64, CudaError> {
    let mut size: usize = 0;
    // SAFETY: with a null buffer and size 0 cuBLASLt only writes the needed
    // size into `size`; `algo` is a valid algorithm from the heuristic.
    unsafe { sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut size) }
        .result()
        .map_err(err("algorithm config size"))?;
    let mut bytes = [0u8; 8];
    if size == 0 || size > bytes.len() {
        return Err(CudaError::Blas(format!("algorithm config {attr:?} has unexpected size {size}")));
    }
    let mut written: usize = 0;
    // SAFETY: `bytes` has room for `size` ≤ 8 bytes.
    unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, bytes.as_mut_ptr().cast::<c_void>(), size, &mut written)
    }
    .result()
    .map_err(err("algorithm config"))?;
    // Little-endian: the low bytes hold the value; sign-extend 4-byte fields
    // (ids are int32 in the header; SPLITK_NUM can be negative in principle).
    Ok(match size {
        4 => i64::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        _ => i64::from_le_bytes(bytes),
    })
}

/// Layouts and pointers of one matmul. `c` may equal `d` (in place).
#[derive(Debug, Clone, Copy)]
pub struct MatmulCall<'a> {
    pub desc: &'a MatmulDesc,
    pub layouts: [&'a MatrixLayout; 4],
    /// alpha and beta in the descriptor's scale type (FP32 or INT32), as host bytes.
    pub alpha: [u8; 4],
    pub beta: [u8; 4],
    pub a: DevPtr,
    pub b: DevPtr,
    pub c: DevPtr,
    pub d: DevPtr,
    pub algo: &'a Algo,
    pub workspace: DevPtr,
    pub workspace_bytes: usize,
}

/// D = epilogue(alpha·op(A)·op(B) + beta·C) on `stream`. Host work only (no
/// allocation, no heuristic), so it can be captured in a CUDA graph. The
/// caller guarantees that every pointer addresses device memory of the sizes
/// the layouts describe and that `algo` came from [`heuristics`] for exactly
/// these descriptors; `crate::blas` is where that holds.
pub fn matmul(handle: &Handle, stream: &CudaStream, call: &MatmulCall<'_>) -> Result<(), CudaError> {
    let [la, lb, lc, ld] = call.layouts;
    // SAFETY: descriptors are live; alpha/beta are 4 host bytes of the scale type
    // (the default host pointer mode) read during the call; device pointers and
    // the algorithm are the caller's contract above.
    unsafe {
        result::matmul(
            handle.0,
            call.desc.raw,
            call.alpha.as_ptr().cast(),
            call.beta.as_ptr().cast(),
            call.a as *const c_void,
            la.0,
            call.b as *const c_void,
            lb.0,
            call.c as *const c_void,
            lc.0,
            call.d as *mut c_void,
            ld.0,
            call.algo,
            call.workspace as *mut c_void,
            call.workspace_bytes,
            stream.cu_stream().cast(),
        )
    }
    .map_err(err("matmul"))
}
