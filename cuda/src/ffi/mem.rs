//! Device buffers and raw copies between host memory and device addresses.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::CudaError;
use crate::ffi::DevPtr;

/// A device allocation the engine keeps for its whole life (weights, an
/// activation arena, a workspace), addressed by raw pointers.
#[derive(Debug)]
pub struct DeviceBuffer {
    slice: Option<CudaSlice<u8>>,
    ptr: DevPtr,
    len: usize,
}

impl DeviceBuffer {
    /// `len` zeroed bytes on `stream`'s device (`len` 0 gives a null buffer).
    pub fn zeroed(stream: &Arc<CudaStream>, len: usize) -> Result<Self, CudaError> {
        if len == 0 {
            return Ok(Self { slice: None, ptr: 0, len: 0 });
        }
        let slice = stream.alloc_zeros::<u8>(len).map_err(CudaError::driver("device allocation"))?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(stream);
            ptr
        };
        Ok(Self { ptr, slice: Some(slice), len })
    }

    /// Uploads `bytes` into a new buffer.
    pub fn from_host(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<Self, CudaError> {
        let buf = Self::zeroed(stream, bytes.len())?;
        htod(stream, bytes, buf.ptr, buf.len)?;
        Ok(buf)
    }

    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address `offset` bytes in, checked against the buffer's length for `bytes` bytes.
    pub fn at(&self, offset: usize, bytes: usize) -> Result<DevPtr, CudaError> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(self.ptr + offset as u64),
            _ => Err(CudaError::InvalidArgument(format!(
                "{bytes} bytes at offset {offset} exceed a device buffer of {} bytes",
                self.len
            ))),
        }
    }

    /// Keeps the allocation alive as long as the buffer (the slice is only held).
    pub fn is_allocated(&self) -> bool {
        self.slice.is_some()
    }
}

/// Asynchronous copy of `src` to device address `dst`, which must have room for
/// `capacity` bytes (checked against `src.len()`).
pub fn htod(stream: &CudaStream, src: &[u8], dst: DevPtr, capacity: usize) -> Result<(), CudaError> {
    if src.len() > capacity {
        return Err(CudaError::InvalidArgument(format!("copy of {} bytes into {capacity}", src.len())));
    }
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` has room for `src.len()` bytes (checked above against the
    // caller's capacity, which callers take from a DeviceBuffer bound). The copy
    // is asynchronous: callers keep `src` alive and unchanged until the stream
    // is synchronised (pinned staging buffers or a synchronize before return).
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, stream.cu_stream()) }
        .map_err(CudaError::driver("copy host to device"))
}

/// Asynchronous copy of `dst.len()` bytes from device address `src` (which must
/// hold at least `capacity` ≥ `dst.len()` bytes) into `dst`.
pub fn dtoh(stream: &CudaStream, src: DevPtr, capacity: usize, dst: &mut [u8]) -> Result<(), CudaError> {
    if dst.len() > capacity {
        return Err(CudaError::InvalidArgument(format!("copy of {} bytes out of {capacity}", dst.len())));
    }
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: as `htod`; callers synchronise before reading `dst`.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }
        .map_err(CudaError::driver("copy device to host"))
}

/// Asynchronous device-to-device copy of `bytes` bytes.
pub fn dtod(stream: &CudaStream, src: DevPtr, dst: DevPtr, bytes: usize) -> Result<(), CudaError> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: both addresses come from engine buffers checked with `DeviceBuffer::at`.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(CudaError::driver("copy device to device"))
}

/// Asynchronous zero fill of `bytes` bytes at `dst`.
pub fn zero(stream: &CudaStream, dst: DevPtr, bytes: usize) -> Result<(), CudaError> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: `dst` addresses at least `bytes` bytes of an engine buffer.
    unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }
        .map_err(CudaError::driver("zero device memory"))
}

/// Turns off cudarc's per-allocation event tracking for `ctx`. The engine
/// orders all work on its own streams and captures CUDA graphs, where the
/// extra event records would become graph nodes (or break capture).
pub fn disable_event_tracking(ctx: &cudarc::driver::CudaContext) {
    // SAFETY: the engine allocates its buffers once, uses each on the streams
    // of the context that owns it, and synchronises a stream before freeing
    // anything it used — the obligations cudarc lists for this switch.
    unsafe { ctx.disable_event_tracking() }
}

/// Whether cuBLASLt (`libcublasLt.so`) can be opened.
pub fn cublaslt_present() -> bool {
    // SAFETY: a dlopen() probe; no symbol is called.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// Whether cuDNN (`libcudnn.so`) can be opened.
pub fn cudnn_present() -> bool {
    // SAFETY: a dlopen() probe; no symbol is called.
    unsafe { cudarc::cudnn::sys::is_culib_present() }
}

/// A captured CUDA graph that may move to another thread. cudarc leaves
/// `CudaGraph` `!Send` because graph objects must not be used *concurrently*;
/// an execution context owns its graphs and is used by one thread at a time
/// (`&mut self`), which is all CUDA requires.
pub struct OwnedGraph(pub cudarc::driver::CudaGraph);

// SAFETY: see the type's docs — exclusive ownership, no concurrent access.
unsafe impl Send for OwnedGraph {}

impl std::fmt::Debug for OwnedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnedGraph")
    }
}
